"""The bus: an XSUB/XPUB broker, pub/sub helpers, req/rep control and the reliable journal."""
