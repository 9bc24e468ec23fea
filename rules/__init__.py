"""Built-in rule packs; installed as ``autoprobe.packs`` (see pyproject.toml)."""
