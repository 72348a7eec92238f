"""The fleet page's filter form: it validates the query string of the page, of its htmx
list requests and of the live socket (`/ws/fleet/?status=running&q=...`) the same way."""

from __future__ import annotations

from typing import Any

from django import forms


class SessionFilterForm(forms.Form):
    q = forms.CharField(required=False, max_length=200, strip=True)
    gateway = forms.IntegerField(required=False, min_value=1)
    agent = forms.IntegerField(required=False, min_value=1)
    status = forms.CharField(required=False, max_length=50)
    kind = forms.CharField(required=False, max_length=50)
    channel = forms.CharField(required=False, max_length=100)
    gone = forms.BooleanField(required=False)
    page = forms.IntegerField(required=False, min_value=1, max_value=1_000_000)

    def filters(self) -> dict[str, Any]:
        """The cleaned filters; invalid fields are dropped instead of failing the page."""
        self.is_valid()
        data = getattr(self, "cleaned_data", {})
        return {
            name: data.get(name)
            for name in self.fields
            if name not in self.errors and data.get(name) not in (None, "")
        }
