"""Where BitLoot expects a delivered key, what its download is called, and the completion email's
idempotency key. BitLoot's rules, not any service's: the adapters store, sign and send whatever they are given.

The key layout is the one BitLoot's reveal endpoint reads (`docs/design.md`, section 4 step 5 and section 9).
"""

from __future__ import annotations

from bitloot_reconcile.adapters.resend import MAX_IDEMPOTENCY_KEY_LENGTH

EXTENSIONS: dict[str, str] = {
    "text/plain": "txt",
    "image/jpeg": "jpg",
    "image/png": "png",
    "image/gif": "gif",
    "application/octet-stream": "bin",
}
FALLBACK_EXTENSION = "bin"
COMPLETION_KEY_PREFIX = "order-completed/"


def key_extension(content_type: str) -> str:
    """File extension for a key's content type (`text/plain` -> `txt`, ...); unknown types -> `bin`."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    return EXTENSIONS.get(mime, FALLBACK_EXTENSION)


def _ids(order_id: str, order_item_id: str) -> tuple[str, str]:
    """The order id and the first 8 characters of the item id, refused when they could escape the path."""
    oid, iid = str(order_id or "").strip(), str(order_item_id or "").strip()
    for name, value in (("order_id", oid), ("order_item_id", iid)):
        if not value:
            raise ValueError(f"{name} must not be empty")
        if "/" in value or "\\" in value or value in (".", ".."):
            raise ValueError(f"{name} must not contain path separators")
    return oid, iid[:8]


def key_object_path(order_id: str, order_item_id: str, content_type: str) -> str:
    """`orders/{orderId}/key-{first 8 chars of item id}.{ext}`: where BitLoot's reveal endpoint looks."""
    oid, item8 = _ids(order_id, order_item_id)
    return f"orders/{oid}/key-{item8}.{key_extension(content_type)}"


def attachment_filename(order_id: str, order_item_id: str, content_type: str) -> str:
    """Download name offered by the presigned URL: `bitloot-key-{orderId}-{item8}.{ext}`."""
    oid, item8 = _ids(order_id, order_item_id)
    return f"bitloot-key-{oid}-{item8}.{key_extension(content_type)}"


def completion_idempotency_key(order_id: str) -> str:
    """Idempotency-Key of an order's completion email: `order-completed/<order_id>`, stable across retries, so a
    retry after a lost response replays Resend's first answer instead of mailing the customer twice."""
    oid = str(order_id).strip() if order_id is not None else ""
    if not oid:
        raise ValueError("order_id must not be empty")
    key = f"{COMPLETION_KEY_PREFIX}{oid}"
    if len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise ValueError(f"idempotency key would be {len(key)} characters; Resend allows at most "
                         f"{MAX_IDEMPOTENCY_KEY_LENGTH}")
    return key
