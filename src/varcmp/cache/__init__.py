"""The feature cache's storage: the backends (store), writing (writer), reading (reader) and the writers'
locks (locks). What the store holds is defined in `varcmp.cache_schema`."""
