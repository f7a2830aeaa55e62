"""The jobs the nodes call, one call per node: text to video, the VAE's frames in and out, video prompts
(image to video, extend, connect), long video and packed sampling. Each takes the loaded models, a
``SolverSettings`` where it samples, and host services (device, progress, interrupt) as arguments and
callbacks; it imports ``model_defs`` (networks, weight I/O, sampling math) and nothing above it."""
