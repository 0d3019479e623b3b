from gspo.cli import app

app()
