"""Imports every REST area so each registers its routes with app.ROUTE_PROVIDERS."""
