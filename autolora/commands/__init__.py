"""Extra CLI commands, one module each (`add_parser(sub)`, `run(args)`)."""
