"""A blinded reader study of real and generated chest X-rays, run in a browser (`lunggen-reader-study`):

    study.py     `create`: the images drawn (balanced real and synthetic per arm, stratified by label), re-encoded
                 under random IDs, each reader's seeded order; the answer key and the orders in SQLite
    store.py     the SQLite database (WAL): schema, connections, the reader's next item, an answer written once
    app.py       `serve`: the FastAPI web app (Jinja templates, uvicorn), personal-token routes only
    analysis.py  `analyze`: accuracy, AUROC, quality, agreement, findings, per arm, subgroup and experience;
                 report.md / report.json / PNG plots / card_section.md
    cli.py       the three commands
"""
