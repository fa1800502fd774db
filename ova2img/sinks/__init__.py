"""Sink layer: where the assembled tree goes (a docker-import tarball; later a Docker engine or a
loadable image)."""
