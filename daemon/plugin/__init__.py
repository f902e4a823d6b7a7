"""How a part plugs in: what it registers (``entries.py``) and what its builder is
given and hands back (``parts.py``). Tasks, outer syncs and data sources import this
package; the composition root (``daemon/run``) fills the registries."""
