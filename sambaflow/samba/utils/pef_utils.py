"""`sambaflow.samba.utils.pef_utils`: PEF metadata."""

from sambaflow.app.driver import get_pefmeta

__all__ = ["get_pefmeta"]
