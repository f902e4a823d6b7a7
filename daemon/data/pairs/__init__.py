"""(query, document) pairs for the two-tower retrieval task: what each pair is and which are
held out (``split``), the ``code`` corpus of docstrings and the functions they describe,
read from the interpreter's own Python sources (``code``), and the ``pairs`` corpus of the
user's own ``.jsonl``/``.parquet`` files (``files``).

Nothing here imports a model library, so ``minerd config validate`` can check the files.
"""
