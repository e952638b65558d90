"""Deploy: board profiles (`devices/*.toml`), the fit check, and bundles to copy to a board."""
