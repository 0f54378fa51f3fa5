"""Jobs on top of finished reports: compare two runs (`diff`) and mine a report's images
(`similar`, `cluster`, `export`). They read reports through patchaudit.store and aggregate with
DuckDB / pyarrow compute; only `similar --image FILE` loads a model (to embed a new file).
"""
