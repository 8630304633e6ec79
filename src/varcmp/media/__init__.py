"""What users have, read as the encoders expect it: videos (video), audio (audio), the files of a folder
(files), caption files (captions), the plan of an extraction (plan) and its decoding workers (decoding)."""
