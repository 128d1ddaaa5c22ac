"""Pure decisions with no I/O: which executor serves a client, how many replicas run."""
