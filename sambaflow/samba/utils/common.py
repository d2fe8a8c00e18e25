"""`sambaflow.samba.utils.common`: the app driver."""

from sambaflow.app.driver import common_app_driver

__all__ = ["common_app_driver"]
