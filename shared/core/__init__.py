"""The domain core: Redis keys, request/batch states, records, the store (sync and async faces
over the same keys and Lua scripts in ``lua/``) and the embedded Redis for local runs."""
