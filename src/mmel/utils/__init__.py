"""Small shared helpers: run directories, results files, Hydra instantiation of loggers and callbacks."""
