from __future__ import annotations

from django.urls import path

from cron import views

urlpatterns = [
    path("cron/", views.cron_list, name="cron"),
    path("cron/<int:pk>/<slug:action>/", views.cron_action, name="cron-action"),
]
