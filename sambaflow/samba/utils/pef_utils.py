"""`sambaflow.samba.utils.pef_utils`: PEF metadata."""

from sambaflow.app.driver import get_pefmeta
from sambaflow.app.pef_meta import PefInfoStruct, get_pef_info, get_pefmeta_dict

__all__ = ["PefInfoStruct", "get_pef_info", "get_pefmeta", "get_pefmeta_dict"]
