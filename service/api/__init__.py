"""HTTP routes, one router per resource, thin over the service layer."""
