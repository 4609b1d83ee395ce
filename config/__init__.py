"""Default settings and relation templates (TOML), shipped with the package."""
