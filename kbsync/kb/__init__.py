"""The knowledge-base side of kbsync.

snapshot: FactTable -> Wikidata-shaped N-Triples. local: LocalKB, the embedded oxigraph
server. sparql: SparqlClient (polite, retrying, strict) and KBError. queries: the portable
SPARQL text. lookup: label resolution and fact reads. watch: Watcher and its Cursor.

MODES: how a watcher finds changes (here, so that settings can be checked without importing the
SPARQL client).
"""

MODES = ("revision", "modified")
