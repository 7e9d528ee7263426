"""secured-endpoint-operator: fresh OAuth 2.0 access tokens for API gateways, kept in Secrets and Redis."""

__version__ = "0.1.0"
