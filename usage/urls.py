from __future__ import annotations

from django.urls import path

from usage import views

urlpatterns = [
    path("usage/", views.usage_page, name="usage"),
    path("usage/usage.csv", views.usage_csv, name="usage-csv"),
    path("metrics", views.metrics_view, name="metrics"),
]
