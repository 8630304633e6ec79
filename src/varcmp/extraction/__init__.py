"""Extraction, the stages of `varcmp-extract`: a run's settings and summary (options), the store
side before encoding (split), the encoders and what they encode (encode), finalizing a split
(finalize), the end-of-run report (report) and several processes, torchrun or shards (group).
`varcmp.extract` is the entry point that joins them."""
