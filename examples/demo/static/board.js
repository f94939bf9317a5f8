// The demo board's client: one websocket to /ws/<channel>, reconnecting with backoff.
(function () {
  "use strict";
  var channel = document.currentScript.dataset.channel;
  var board = document.getElementById("board");
  var state = document.getElementById("state");
  var form = document.getElementById("post");
  var delay = 500;

  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    var ws = new WebSocket(scheme + location.host + "/ws/" + channel);
    ws.onopen = function () { state.textContent = "live"; delay = 500; };
    ws.onmessage = function (event) {
      var item = document.createElement("li");
      item.innerHTML = JSON.parse(event.data).text;  // escaped by the server
      board.insertBefore(item, board.firstChild);
    };
    ws.onclose = function () {
      state.textContent = "reconnecting...";
      setTimeout(connect, delay * (0.5 + Math.random()));
      delay = Math.min(delay * 2, 10000);
    };
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var body = new URLSearchParams(new FormData(form));
    fetch("/post", { method: "POST", body: body, headers: { Accept: "application/json" } })
      .then(function () { form.reset(); });
  });

  connect();
}());
