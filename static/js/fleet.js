// Live fleet pages: htmx and its ws extension do the work; this file only
// (1) says "reconnecting…" while the page's socket is down ("signed out" when it
//     was closed because the account lost access),
// (2) (re)connects with the filters the session list currently shows, and
// (3) tells the open socket when an htmx swap changed those filters, and drops the
//     list parts still in flight for the filters the page showed before (each part
//     says in data-for which filters it was rendered for).
// Relative times ("5 minutes ago") are kept current by ago.js, on every page.
(function () {
  "use strict";
  var socket = null;
  var followed = null; // the filters the socket was last told the list shows

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

  // The navigation's badge socket (/ws/nav/, on every page) is not this page's socket.
  function fromNav(event) {
    return !!(event.target && event.target.closest && event.target.closest(".topnav"));
  }

  // Every (re)connect asks for the list as the browser shows it now.
  htmx.createWebSocket = function (url) {
    var query = currentQuery();
    if (query !== null && url.indexOf("/ws/fleet/") !== -1) {
      followed = query;
      url = url.split("?")[0] + (query ? "?" + query : "");
    }
    return new WebSocket(url);
  };

  document.addEventListener("htmx:wsOpen", function (event) {
    if (fromNav(event)) return;
    socket = event.detail.socketWrapper;
    setStatus("live", false);
  });
  document.addEventListener("htmx:wsClose", function (event) {
    if (fromNav(event)) return;
    // 4003: the account lost access (logged out, deactivated, no role): no reconnect
    // (fleet/live.py CLOSE_ACCESS_LOST).
    var closed = event.detail && event.detail.event;
    if (closed && closed.code === 4003) {
      setStatus("signed out: reload the page", true);
    } else {
      setStatus("reconnecting…", true);
    }
  });
  document.addEventListener("htmx:afterSwap", function (event) {
    var target = event.detail.target;
    if (target && target.id === "session-list") {
      followed = currentQuery() || "";
      if (socket) socket.send(JSON.stringify({ query: followed }), null);
    }
  });
  // A live list part rendered for the old filters, sent before the socket read the new
  // ones, would cover the list the swap just showed; nothing would correct it until a
  // row changed.
  document.addEventListener("htmx:oobBeforeSwap", function (event) {
    var fragment = event.detail.fragment;
    var part = fragment && fragment.firstElementChild;
    var renderedFor = part && part.getAttribute("data-for");
    if (renderedFor !== null && renderedFor !== undefined && followed !== null && renderedFor !== followed) {
      event.detail.shouldSwap = false;
    }
  });
})();
