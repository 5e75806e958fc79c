"""Secondary storage: the one chunked, resumable, checksummed copy engine and its store."""
