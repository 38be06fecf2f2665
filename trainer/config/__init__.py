"""The typed run configuration, its presets and config files."""
