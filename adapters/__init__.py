"""Sources and sinks: each a package with Config and build()."""
