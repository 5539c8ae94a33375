"""Pictures of a store's history: ``ckpt plot`` (matplotlib) and ``ckpt ui`` (a read-only
local web app), both drawn from one model (:mod:`ckptstore.ui.model`). See docs/ui.md."""
