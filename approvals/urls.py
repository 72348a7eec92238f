from __future__ import annotations

from django.urls import path

from approvals import views

urlpatterns = [
    path("approvals/", views.inbox, name="approvals"),
    path("approvals/export.csv", views.export_csv, name="approvals-export"),
    path("approvals/<int:pk>/decide/", views.decide, name="approval-decide"),
    path("approvals/grants/<int:gateway_id>/", views.grants, name="approval-grants"),
    path(
        "approvals/grants/<int:gateway_id>/revoke/",
        views.revoke_grant,
        name="approval-grant-revoke",
    ),
]
