"""Everything that turns a data source into a `datasets.Dataset`."""
