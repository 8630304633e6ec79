"""`varcmp serve`: a local web page and JSON API over a checkpoint's stored video index (app)."""
