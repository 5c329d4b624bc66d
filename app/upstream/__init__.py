"""Rate sources: the Flutterwave client and the demo provider. Knows nothing of storage or the web."""
