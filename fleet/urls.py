from __future__ import annotations

from django.urls import path

from fleet import views

urlpatterns = [
    path("", views.fleet, name="fleet"),
    path("gateways/<int:pk>/", views.gateway_detail, name="gateway-detail"),
    path("sessions/<int:pk>/", views.session_detail, name="session-detail"),
    path("healthz", views.healthz, name="healthz"),
]
