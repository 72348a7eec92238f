from __future__ import annotations

from django.urls import path

from chat import views

app_name = "chat"
urlpatterns = [
    path("chat/new/", views.new_chat, name="new"),
    path("chat/search/", views.search, name="search"),
    path("chat/<int:pk>/", views.session_page, name="session"),
    path("chat/<int:pk>/send/", views.send, name="send"),
    path("chat/<int:pk>/abort/", views.abort, name="abort"),
    path("chat/<int:pk>/older/", views.older, name="older"),
]
