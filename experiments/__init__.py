"""Studies built on the library: each folder has its own command, configs, analysis and README."""
