"""The service's self-description: the OpenAPI and AsyncAPI documents and the page that renders the latter."""
