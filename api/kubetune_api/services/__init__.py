"""The API's logic: routers call services; services call backends and the object store."""
