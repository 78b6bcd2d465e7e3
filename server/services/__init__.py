"""The domain: keys, limits, quotas, usage, cache and logs. Used by the API and the CLI."""
