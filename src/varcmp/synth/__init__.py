"""The synthetic benchmark: a world with planted structure at every level (world), and the same world as
real media files (media). The design of the world is the docstring of `varcmp.synth.world`."""
