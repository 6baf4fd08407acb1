"""Small CLI subcommands that drive the core library directly (generate, info, demo)."""
