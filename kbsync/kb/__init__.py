"""The knowledge-base side of kbsync: snapshot, local oxigraph KB, SPARQL client, queries, watcher."""
