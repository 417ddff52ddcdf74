"""Single-process training around the method core: config, data, input path, loop, checkpoints."""
