// The demo board's client, on stackctl's realtime.js: it reconnects and resumes by itself.
(function () {
  "use strict";
  var board = document.getElementById("board");
  var state = document.getElementById("state");
  var form = document.getElementById("post");
  var SHOWN = 50; // the newest messages; older ones leave the board

  // A new visitor starts from the first id: the channel's history (what Redis keeps of it)
  // comes first, so the board shows what was said before the page opened.
  new window.StackctlFeed([document.currentScript.dataset.channel], {
    since: "0-0",
    onstatus: function (status) { state.textContent = status === "open" ? "live" : status; },
    onmessage: function (data) {
      if (data.job) { showProgress(data.job, data.progress); return; }
      var item = document.createElement("li");
      item.textContent = data.text;
      board.insertBefore(item, board.firstChild);
      while (board.children.length > SHOWN) board.removeChild(board.lastChild);
    },
  });

  // A slow job's progress: one line per job, updated in place as the worker reports.
  function showProgress(job, progress) {
    var item = document.getElementById("job-" + job);
    if (!item) {
      item = document.createElement("li");
      item.id = "job-" + job;
      item.className = "job";
      item.appendChild(document.createElement("progress")).max = 100;
      item.appendChild(document.createElement("span"));
      board.insertBefore(item, board.firstChild);
      while (board.children.length > SHOWN) board.removeChild(board.lastChild);
    }
    item.firstChild.value = progress;
    item.lastChild.textContent = " slow job " + job + ": " + progress + " %";
  }

  document.getElementById("job").addEventListener("submit", function (event) {
    event.preventDefault();
    var note = event.target.querySelector("span");
    fetch("/job", { method: "POST", headers: { Accept: "application/json" } })
      .then(function (response) {
        // Refused (too many jobs under way): say why beside the button.
        if (!response.ok) return response.text().then(function (text) {
          note.textContent = "(" + text.trim() + ")";
        });
      });
  });

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var body = new URLSearchParams(new FormData(form));
    fetch("/post", { method: "POST", body: body, headers: { Accept: "application/json" } })
      .then(function () { form.reset(); });
  });
}());
