"""Alembic's folder, shipped as a package so ``atelier db upgrade`` finds it when installed."""
