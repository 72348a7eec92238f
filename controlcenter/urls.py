from __future__ import annotations

from django.urls import include, path

from fleet.admin import site as admin_site

urlpatterns = [
    path("accounts/", include("django.contrib.auth.urls")),
    # The Control Center's admin site: entered by the admin role, not by staff status.
    path("admin/", admin_site.urls),
    path("", include("fleet.urls")),
    path("", include("chat.urls")),
]
