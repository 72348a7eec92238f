from __future__ import annotations

from django.urls import path

from alerts import views

urlpatterns = [
    path("alerts/", views.alert_list, name="alerts"),
    path("alerts/<int:pk>/acknowledge/", views.acknowledge, name="alert-acknowledge"),
    path("alerts/<int:pk>/resolve/", views.resolve, name="alert-resolve"),
]
