"""The Gthulhu side: one client module per API generation, reconciliation, the test server."""
