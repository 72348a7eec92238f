// Live fleet pages: htmx and its ws extension do the work; this file only
// (1) says "reconnecting…" while the page's socket is down,
// (2) (re)connects with the filters the session list currently shows, and
// (3) tells the open socket when an htmx swap changed those filters.
(function () {
  "use strict";
  var socket = null;

  function setStatus(text, down) {
    var el = document.getElementById("live-status");
    if (el) {
      el.textContent = text;
      el.classList.toggle("down", down);
    }
    document.body.classList.toggle("ws-down", down);
  }

  function currentQuery() {
    var list = document.getElementById("session-list");
    return list ? list.getAttribute("data-query") || "" : null;
  }

  // Every (re)connect asks for the list as the browser shows it now.
  htmx.createWebSocket = function (url) {
    var query = currentQuery();
    if (query !== null) {
      url = url.split("?")[0] + (query ? "?" + query : "");
    }
    return new WebSocket(url);
  };

  document.addEventListener("htmx:wsOpen", function (event) {
    socket = event.detail.socketWrapper;
    setStatus("live", false);
  });
  document.addEventListener("htmx:wsClose", function () {
    setStatus("reconnecting…", true);
  });
  document.addEventListener("htmx:afterSwap", function (event) {
    var target = event.detail.target;
    if (socket && target && target.id === "session-list") {
      var list = document.getElementById("session-list");
      socket.send(JSON.stringify({ query: list.getAttribute("data-query") || "" }), null);
    }
  });
})();
