"""Project basics with no heavy dependency: errors, params, file I/O, the stage entry point."""
